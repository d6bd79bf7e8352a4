from adrenaline.sim.cli import main

main()
