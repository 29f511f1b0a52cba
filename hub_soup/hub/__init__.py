"""The Hugging Face Hub: resolving refs to pinned commits, fetching only what a soup
needs, the model card, the push, and turning huggingface_hub's errors into ours."""
