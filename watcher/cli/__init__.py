"""The commands: `watcher run`, `check` and `demo` (`main`), the checks of `check`, the
demo, and the embedded SeaweedFS S3 server the demo and the tests start."""
