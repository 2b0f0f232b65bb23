"""The daemon's life: start-up, the poll loop, the worker pool and the drain (`daemon`),
and the operator's HTTP surface (`http`), which reads a status snapshot, never the
daemon itself."""
