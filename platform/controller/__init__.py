"""The fog controller: registry, decisions (sans-IO core) and the loop that runs them."""
