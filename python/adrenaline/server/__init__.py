"""Serving through SGLang's own front end: our scheduler process speaks SGLang's io_struct messages.

SGLang's HTTP server, TokenizerManager and DetokenizerManager stay unchanged; ``launch_server``
hands SGLang ``scheduler_process.run_scheduler_process`` as the scheduler process.
"""
