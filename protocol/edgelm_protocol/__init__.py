"""edgelm wire contract, shared by the agent and the control plane (sans-IO).

Empty for now; the sync issue fills it.
"""
