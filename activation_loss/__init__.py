"""activation_loss"""
