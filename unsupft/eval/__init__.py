"""unsupft.eval"""
