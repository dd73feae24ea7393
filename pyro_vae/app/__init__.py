"""The top layer: the ``pyro-vae`` program.

Its parser (:mod:`~pyro_vae.app.cli`), the commands it runs (:mod:`~pyro_vae.app.commands`,
:mod:`~pyro_vae.app.classify`), the plots (:mod:`~pyro_vae.app.plots`) and the start-up that
answers Ctrl-C (:mod:`~pyro_vae.app.launch`). Everything here calls the library below it; a
library error names Python parameters, and the command line prints them as its flags.
"""
