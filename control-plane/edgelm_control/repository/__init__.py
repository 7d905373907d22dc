"""The fleet's TUF repository: pushes checked (:mod:`.push`), published (:mod:`.service`),
and served over HTTP (:mod:`.routes`)."""
