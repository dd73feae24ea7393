from pyro_vae.app.launch import run

run()
