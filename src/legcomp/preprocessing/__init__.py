"""Preprocessing: leg splitting (:mod:`~legcomp.preprocessing.legs`) and network inputs, working grid
and leg crops (:mod:`~legcomp.preprocessing.inputs`), shared by training and inference."""
