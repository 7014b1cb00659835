"""seq2seq: the core library of the NMT pipeline (params schema, text I/O, tokenizer, models, decoding)."""
