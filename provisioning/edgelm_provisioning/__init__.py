"""edgelm provisioning: fleet keys, device identities, enrollment bundles.

Empty for now; the provisioning issue fills it.
"""
