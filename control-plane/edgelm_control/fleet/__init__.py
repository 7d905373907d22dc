"""The fleet link: MQTT in (:mod:`.ingest`, :mod:`.batch`) and out (:mod:`.ports`, :mod:`.link`)."""
