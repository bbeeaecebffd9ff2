"""Readers of source layouts: one module per layout a data set can come in.

A reader finds the metadata and image files of a source folder and returns one row per image
(``image_id``, ``lesion_id``, ``dx``, optional metadata columns, ``source`` = the image's path
relative to the folder) plus the :class:`~dermcam.data.problems.Problem` list of everything it had
to repair or skip. Everything after that (classes, hashing, splitting, the cache) is shared in
:mod:`dermcam.data.prepare`, so a new layout is a new module here and nothing else.
"""
