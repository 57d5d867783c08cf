"""The data room: the obs contract, reading and checking data, genes, the catalog and the simulator.

Nothing here imports torch.
"""
