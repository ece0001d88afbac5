"""unsupft.select"""
