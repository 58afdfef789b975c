
”‘	€όδB[Λ2*

route_name
httproute/shop/chat/rule/02'
access_log_type
DownstreamPeriodic2
x-request-id
ws-12
duration
ÿÿÿÿÿÿÿÿ