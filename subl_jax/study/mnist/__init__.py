"""The MNIST auxiliary-logit study (docs/protocol.md §8): many MLPs trained at once, vmapped and sharded."""
