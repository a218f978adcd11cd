"""What every layer shares and none owns: the table of the six services (table.py), their settings read from
the environment (config.py) and the kinds of error a request can meet (errors.py).

runners/ (model execution), embed_http/ (the wire protocols), embed_ops/ (operator tools) and deploy/ import it;
it imports none of them, and nothing heavy (no torch, no BentoML).
"""
