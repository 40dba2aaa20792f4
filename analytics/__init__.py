"""The analytics: the seeds' reports read from rollups the database keeps
(migration 0009), the ``usertrail analytics`` command's data, and the
dashboard's JSON API and page (``usertrail dashboard``)."""
