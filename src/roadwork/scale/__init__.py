"""Beyond one process: batch prediction over folders and manifests, locally or on Ray."""
