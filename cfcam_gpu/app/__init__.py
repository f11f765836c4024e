"""The application floor: the ``cfcam`` command line and what it needs (models by name, image files,
overlays and contact sheets, output files, evaluation reports, torchrun). The core (``cfcam_gpu``'s top
level and ``cfcam_gpu.methods``) never imports this package."""
