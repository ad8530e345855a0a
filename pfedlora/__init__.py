"""pfedlora: model-heterogeneous personalized federated learning with low-rank adapters.

pFedLoRA (Yi et al., arXiv 2310.13283) gives every client a private model of its own architecture plus a
small homogeneous low-rank adapter; only the adapters travel and are averaged by the server.
"""

__version__ = "0.1.0"
