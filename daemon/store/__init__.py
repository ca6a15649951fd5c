"""The expert store: the on-disk manifest, packing, checkpoint reading, codecs and the verified reader."""
