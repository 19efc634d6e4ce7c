"""Encoders of the expert weight encodings, one module per format of
`vllm_aimer.encodings`: each writes a weight [out, in] as that format stores it
(`encode`) and the config that declares it (`quantization_config`). The tests build
tiny quantized checkpoints with them; the loader never imports them."""
