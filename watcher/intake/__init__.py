"""Finding work: listing the input prefix (`discovery`, once for the fleet: `fleet`),
notifications pushed over HTTP (`events`) or read from SQS (`sqs`), and the bounded,
deduplicated `queue` they all feed."""
