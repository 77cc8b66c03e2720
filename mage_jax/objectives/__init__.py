"""What a step optimises: the masking law, MAGE's token loss, MAGE-C's contrastive term, mixup for fine-tuning, the
tokenizer's losses.
"""
