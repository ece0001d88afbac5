"""unsupft.train"""
