"""seq2seq: the core library of the NMT pipeline. Its public API, by module (`__all__`):

  config         load_params, Params and its sections: params.yaml's schema; ParamsError
  textio         read_lines, read_aligned, atomic_write, write_json; TextFormatError
  tokenizer      Tokenizer, train_sentencepiece, the special ids
  data           TokenArray(Writer): token ids on disk; token_batches, collate: training batches
  models         build_model(params.model, vocab_size); FAMILIES: family name -> (config, model class)
  transformer, rnn, attention_rnn    the model families, as in their papers
  cpu            accelerate(model): the CPU fast paths, applied to a built model; quantize_int8 for decoding
  loss           output_loss: the output projection fused with label-smoothed cross-entropy, in chunks
  luong_loop     decoder_outputs: the one-layer Luong attention RNN's teacher-forced loop as one autograd function
  checkpoint     save_checkpoint, load_model (tensor digest checked), check_tokenizer; CheckpointError
  beam, decoding beam_search, greedy_decode, translate_nbest
  translate      translate_texts and the nmt-translate command
  score          score_corpus (sacrebleu BLEU, chrF, TER with signatures) and its command
  serving        Translator: the MLflow pyfunc model; load_translator (weights digest checked), request bounds
  translator_model   the exported model's "models from code" file (set_model(Translator()))
  registry       load_registered: a models:/ URI loaded as data, its weights checked against the registry tag
  redact         redact: credentials in URLs masked for logs and MLflow params
  tracking       MLflow set-up and ResilientRun
  promote, preset, ctranslate2_export, champion_server    commands: python -m seq2seq.<name>

cli, paths, device, parallel and progress are plumbing shared by the stages (stages/), not part of the API.
Nothing is imported here, so `import seq2seq.config` stays cheap for stages that need no torch.
"""

__all__ = [
    "attention_rnn",
    "beam",
    "champion_server",
    "checkpoint",
    "config",
    "cpu",
    "ctranslate2_export",
    "data",
    "decoding",
    "loss",
    "luong_loop",
    "models",
    "preset",
    "promote",
    "redact",
    "registry",
    "rnn",
    "score",
    "serving",
    "textio",
    "tokenizer",
    "tracking",
    "transformer",
    "translate",
    "translator_model",
]
