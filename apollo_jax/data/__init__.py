"""Data: streaming readers (stream_json, records), the pre-tokenised cache (token_cache builds,
corpus reads), the bench TFDS builder, tokenizers, chat template, mixture, packing, pipeline.

Entry point: `pipeline.make_data(config, cache_dir, process_index, process_count)`.
"""
