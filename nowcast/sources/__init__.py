"""Radar sources: the data catalog, file readers, the synthetic source, the cube and ingest.

Modules: :mod:`~nowcast.sources.catalog` (catalog models, file discovery and frame plans),
:mod:`~nowcast.sources.readers` (pysteps importers and CF decoders, one frame at a time),
:mod:`~nowcast.sources.synthetic` (the synthetic source), :mod:`~nowcast.sources.cube` (the
cube's schema, open and write), :mod:`~nowcast.sources.ingest` (the ingest stage) and
:mod:`~nowcast.sources.sample_data` (the pysteps sample data, fetched with pooch).

The package imports none of them, so reading a cube does not load the ingest machinery.
"""
