"""The fleet's TUF repository: pushes checked (:mod:`.push`), key rotations checked
(:mod:`.rotation`), both published (:mod:`.service`), the director's signing key chosen by the
published root (:mod:`.director_keys`), and served over HTTP (``api.repository_routes``)."""
