"""Parallel training layouts: the device mesh's dimensions (:mod:`.layout`, torch-free), building the mesh and
wrapping a model over it (:mod:`.mesh`), and each architecture's tensor-parallel plan (:mod:`.kunlunbaize`)."""
