"""The paper's evaluation, reproduced and extended on the testbed."""
