"""The ``edgelm`` command: one entry point whose groups live in the deployable packages."""
