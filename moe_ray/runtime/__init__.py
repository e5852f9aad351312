"""The Ray runtime: the coordinator actor, the expert workers (Ray Train) and the driver."""
