"""The dataset tools' libraries: the VG file-name format, UTM conversions, safe output folders, the synthetic world
and datasets made of your own photos. Their command lines are `synthetic.py` and `make_vg_dataset.py`."""
