"""A procedural street-view world for visual place recognition, in the visual geo-localization benchmark layout.

Split by job: `textures` draws facades and ground from seeds, `scene` places cameras in a street and renders views
(with the true homographies of the facade plane between them), `world` lays out the splits and writes the images,
their file names and homographies.json, `cli` is the command line of `synthetic.py`. The same arguments give
byte-identical files.
"""
