"""What a checkpoint holds and how its bytes are read: the index of a checkpoint's files
(torch zip, legacy torch, safetensors, shard indexes, Hugging Face folders) and the
safetensors writer."""
