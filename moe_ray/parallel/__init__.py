"""Expert parallelism over torch.distributed: placement, all-to-all dispatch, gradient sync.
Knows nothing of Ray: the runtime forms the process group and passes it in."""
