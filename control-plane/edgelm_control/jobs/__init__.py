"""Remote jobs: a request to devices, with a result per device (:mod:`.service`, :mod:`.states`)."""
