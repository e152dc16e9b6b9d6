"""Data: readers (records), TFDS builders, tokenizers, chat template, mixture, packing, pipeline.

Entry point: `pipeline.make_data(config, cache_dir, process_index, process_count)`.
"""
