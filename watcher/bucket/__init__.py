"""The bucket: the S3 client (`storage`), where each thing lives in it (`names`), the
claim objects that keep replicas apart (`leases`) and the markers that say a source
version is finished (`done`). Everything that must survive a crash lives here, in S3."""
