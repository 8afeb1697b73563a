"""HCache on models split over several devices by transformers' tensor parallelism.

    tp.py          the model's tensor-parallel group, this rank, the agreements between ranks
    shards.py      which rank saves and reads which chunk; K/V key sharding (pure functions)
    gather.py      the all-gather of a layer's hidden state between its read and its projection
    projection.py  this rank's K/V heads from the whole hidden state
    stores.py      how a rank reaches chunks other ranks stored (and NodeStores, the roots of one node)
    profile.py     what `auto` plans with: aggregate read bandwidth and the all-gather's cost

HCache detects a tensor-parallel model itself (`tp.detect`); nothing here is
imported by this package's __init__, so the layout can import `shards` without
a cycle.
"""
