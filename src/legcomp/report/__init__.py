"""legcomp.report"""
