"""The main job (``python -m ftops.bench``): every ftops method fine-tuning MiniLM-L6 on a real
text classification task, side by side, with a Markdown report and plots. See ``__main__``."""
