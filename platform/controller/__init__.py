"""The fog controller: registry, decisions (sans-IO core) and the loop that runs them.

config (how it decides), registry (what it knows), the core in layers: basis (shared state),
planning (follow the device, relieve load, drain), launching (start, retry, lose moves), core
(messages in, actions out); actions (what the core hands back), decide (technique and command
for one move), runner (the core on the bus), drain (emptying a node), access (the testbed's
broker as the controller).
"""
