"""The MNIST auxiliary-logit study (PROTOCOL.md §8): many MLPs trained at once, vmapped and sharded."""
