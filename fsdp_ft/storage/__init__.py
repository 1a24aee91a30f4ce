"""Files on disk: durable writes, safe reads of DCP metadata, weights streamed from model folders."""
