"""ssmc kernels inside other people's model code (``ssmc.integrations.transformers``)."""
