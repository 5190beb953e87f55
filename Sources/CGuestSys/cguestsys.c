#include "cguestsys.h"
