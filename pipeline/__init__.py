"""ResPrune Pipeline: batch VLM answering on Ray Data with visual-token pruning."""
