"""pfedlora on Flower (``pip install 'pfedlora[flower]'``): the same algorithms on real devices.

The ServerApp and ClientApp live in :mod:`pfedlora.flower.apps`; the round loop, the algorithms and
everything they compute are the simulator's. See the README's Flower section and ``examples/flower``.
"""
